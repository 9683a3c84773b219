"""Every projection the service has, by name."""

from __future__ import annotations

from projections.models.customers import CustomerSummaryProjection
from projections.models.daily_sales import DailySalesProjection
from projections.models.history import OrderHistoryProjection
from projections.models.orders import OrdersProjection
from projections.projection import Projection

PROJECTIONS: dict[str, Projection] = {
    projection.name: projection
    for projection in (
        OrdersProjection(),
        OrderHistoryProjection(),
        CustomerSummaryProjection(),
        DailySalesProjection(),
    )
}


def select(names: list[str] | None) -> list[Projection]:
    """The named projections (all when ``names`` is empty); unknown names are an error."""
    if not names:
        return list(PROJECTIONS.values())
    unknown = sorted(set(names) - set(PROJECTIONS))
    if unknown:
        raise SystemExit(
            f"unknown projection(s): {', '.join(unknown)}; known: {', '.join(PROJECTIONS)}"
        )
    return [PROJECTIONS[name] for name in names]
