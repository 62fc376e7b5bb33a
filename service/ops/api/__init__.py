"""REST API and operator dashboard (FastAPI): ``dicom-fusion api``.

``main.create_app(settings)`` builds the app; routes live in ``routes/``, response schemas in
``schemas.py``, dependencies (ledger, Celery, token check) in ``deps.py``. Routes translate service
errors into HTTP statuses; the work itself is done by :mod:`dicom_fusion.service.ops.monitoring`,
:mod:`~dicom_fusion.service.ops.operations` and :mod:`~dicom_fusion.service.ops.readiness`.
"""
