"""Service errors → HTTP statuses, in one place: one exception handler for the whole app.

Routes call the operations and read models directly; a :class:`ServiceError` they raise becomes an
HTTP answer here, with the error's message (which says what to do) as ``detail``, the same body
FastAPI gives an ``HTTPException``.
"""
from __future__ import annotations

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse

from dicom_fusion.service.errors import ActionRefusedError, BrokerError, ServiceError, StudyNotFoundError

_STATUS = {
    StudyNotFoundError: status.HTTP_404_NOT_FOUND,
    ActionRefusedError: status.HTTP_409_CONFLICT,
    BrokerError: status.HTTP_503_SERVICE_UNAVAILABLE,
}


def status_of(exc: ServiceError) -> int:
    """The HTTP status of a service error (500 for one the API does not expect)."""
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return code
    return status.HTTP_500_INTERNAL_SERVER_ERROR


async def _service_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return JSONResponse({"detail": str(exc)}, status_code=status_of(exc))


def install_error_handler(app: FastAPI) -> None:
    """Answer every :class:`ServiceError` a route raises with its HTTP status."""
    app.add_exception_handler(ServiceError, _service_error)
