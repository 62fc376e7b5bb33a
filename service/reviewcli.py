"""`dicom-fusion review list|approve|reject`: clinical review from the console (README "Review").

The same actions as the API's review endpoints (:mod:`dicom_fusion.service.ops.review`). Whoever runs
these on the service's host can reach its ledger; the name given with ``--reviewer`` is recorded as the
verifying observer of the SR, the report's results interpreter and in the audit trail.

Exit codes: 0 done, 1 refused (the message says why and what to do), 2 bad configuration.
"""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dicom_fusion.service.cliopts import ConfigOpt, settings_or_exit
from dicom_fusion.service.errors import ServiceError
from dicom_fusion.service.storage.models import ReviewVerdict

review_app = typer.Typer(no_args_is_help=True, help="Review AI results before release: list, approve, reject.")
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

JobArg = Annotated[int, typer.Argument(help="Job id (first column of `dicom-fusion review list`).")]
ReviewerOpt = Annotated[str, typer.Option("--reviewer", help="Your name, as it goes into the SR and the report.")]
CommentOpt = Annotated[str, typer.Option(help="Comment written into the SR and the report.")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", help="The model (\"name version\") whose result you reviewed; refused if the job has another.")]


def _age(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


@review_app.command("list")
def list_(config: ConfigOpt = None) -> None:
    """Results awaiting review, oldest first (overdue past release.review_timeout_hours)."""
    from dicom_fusion.service.ops.review import worklist
    from dicom_fusion.service.storage.ledger import Ledger

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        items = worklist(ledger, settings)
    finally:
        ledger.close()
    if not items:
        out.print("no result awaits review")
        return
    table = Table("job", "study", "route · model", "finding", "waiting")
    for it in items:
        finding = f"{it.finding} {it.probability:.2f}" if it.finding and it.probability is not None else "–"
        if it.image_only:
            finding += " (image-only)"
        waiting = _age(it.awaiting_seconds) + (" [red]overdue[/red]" if it.overdue else "")
        table.add_row(str(it.job_id), it.study_uid, f"{it.route} · {it.model}", finding, waiting)
    out.print(table)


def _decide(config: ConfigOpt, job_id: int, verdict: ReviewVerdict, reviewer: str, comment: str,
            finding: str | None, model: str | None) -> None:
    from dicom_fusion.service.ops import operations, review
    from dicom_fusion.service.storage.ledger import Ledger

    settings = settings_or_exit(config)
    ledger = Ledger(settings.ledger_url)
    try:
        result = review.decide(ledger, settings, operations.make_enqueue(ledger, settings), job_id,
                               verdict=verdict, reviewer=reviewer, comment=comment, finding=finding,
                               expected_model=model)
    except ServiceError as exc:
        err.print(f"[red]{verdict} refused:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    finally:
        ledger.close()
    out.print(f"{result.study_uid}: {result.message}")


@review_app.command()
def approve(job_id: JobArg, reviewer: ReviewerOpt, comment: CommentOpt = "",
            finding: Annotated[Optional[str], typer.Option(
                help="The class you find instead of the model's (a class name of its model card).")] = None,
            model: ModelOpt = None, config: ConfigOpt = None) -> None:
    """Approve a result: the SR goes VERIFIED with your name, the report becomes final."""
    _decide(config, job_id, ReviewVerdict.APPROVED, reviewer, comment, finding, model)


@review_app.command()
def reject(job_id: JobArg, reviewer: ReviewerOpt, comment: CommentOpt = "", model: ModelOpt = None,
           config: ConfigOpt = None) -> None:
    """Reject a result: nothing goes to the PACS; a preliminary report is marked entered-in-error."""
    _decide(config, job_id, ReviewVerdict.REJECTED, reviewer, comment, None, model)
