"""Service errors → HTTP statuses, in one place (the route layer)."""
from __future__ import annotations

from fastapi import HTTPException, status

from dicom_fusion.service.errors import ActionRefusedError, BrokerError, ServiceError, StudyNotFoundError

_STATUS = {
    StudyNotFoundError: status.HTTP_404_NOT_FOUND,
    ActionRefusedError: status.HTTP_409_CONFLICT,
    BrokerError: status.HTTP_503_SERVICE_UNAVAILABLE,
}


def http_error(exc: ServiceError) -> HTTPException:
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return HTTPException(code, str(exc))
    return HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, str(exc))
