"""dicom-fusion service: DICOM listener, spool, ledger, completion, Celery tasks, SR, dispatch, CLI."""
