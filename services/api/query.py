"""Unknown query parameters are an error, as unknown body fields are: a mistyped filter
(``?teir=key``) must not silently return everything."""

from __future__ import annotations

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from services.api.errors import FieldError, Unprocessable

_known: dict[int, frozenset[str]] = {}


def _declared(dependant: Dependant) -> set[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _declared(sub)
    return names


def _query_names(route: APIRoute) -> frozenset[str]:
    names = _known.get(id(route))
    if names is None:
        names = _known[id(route)] = frozenset(_declared(route.dependant))
    return names


async def reject_unknown_query_params(request: Request) -> None:
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    unknown = sorted(set(request.query_params) - _query_names(route))
    if unknown:
        raise Unprocessable(
            f"Unknown query parameter(s): {', '.join(unknown)}.",
            errors=[
                FieldError(
                    field=f"query.{name}", message="Unknown query parameter", type="extra_forbidden"
                )
                for name in unknown
            ],
        )
