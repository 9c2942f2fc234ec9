"""Choosing between two plans batch by batch, by what each costs per unit of work."""

from __future__ import annotations

from session_cleanup_dagster.steps.loop import _Pace


class _Chooser:
    """Runs, batch by batch, whichever of two plans has lately done more units per cost.

    The cost of a batch is its seconds, or, where the caller measures them, the pages it
    touched (``observe(..., pages=n)``). Pages do not depend on what the cache holds nor on
    the machine's load, and a plan that touches fewer pages per unit leaves more of the
    server to the app; seconds stay what sizes each batch.

    Batch 0 runs the first plan, batch 1 the second, at the same size. From there the
    faster one runs, and the other gets a batch again after 2 batches, then 4, 8, 16, 16, ...
    while the faster one stays ahead (back to 2 when they swap). So a first measurement
    that was off (a cold cache) is corrected early, a rate that changes later is still
    seen, and the slower plan costs at most one batch in 17 once the choice is settled.
    Each plan keeps its own pace: a batch of the slower plan is sized by its own last rate,
    never larger than the faster plan's batches, so it too stays near the target duration.
    """

    MOST_BETWEEN = 16

    def __init__(
        self,
        plans: tuple[str, str],
        first: int,
        most: int,
        target_s: float | None,
        *,
        trial: int | None = None,
    ):
        self.plans = plans
        self.paces = {plan: _Pace(first, most, target_s) for plan in plans}
        # The most units a batch of the slower plan may take when rated by pages: pages per
        # unit hardly depend on a batch's size, so a small trial shows them, and a large one
        # of the dearer plan would cost what the choice saves.
        self.trial = trial
        self.rates: dict[str, float] = {}
        self.runs = dict.fromkeys(plans, 0)  # batches run, by plan
        self.pages: dict[str, int] = {}  # pages touched, by plan (where measured)
        self.best = plans[0]
        self.between = 2  # batches of the faster plan before the other's next one
        self.since = 0  # batches of the faster plan since the other's last one

    def _other(self) -> str:
        return self.plans[1] if self.best == self.plans[0] else self.plans[0]

    def next(self) -> tuple[str, int]:
        """The plan for the next batch, and its size."""
        batches = sum(self.runs.values())
        if batches < len(self.plans):
            plan = self.plans[batches]
        else:
            plan = self._other() if self.since >= self.between else self.best
        pace = self.paces[plan]
        rate = self.rates.get(plan)
        if plan != self.best and rate is not None and pace.target_s and not self.paged:
            ideal = int(rate * pace.target_s)
            pace.size = max(1, min(self.paces[self.best].size, max(pace.size, ideal)))
        size = pace.size
        if self.trial is not None and (plan != self.best or batches < len(self.plans)):
            # The first batch of each plan, and every later trial of the slower one.
            size = min(size, self.trial or size)
        return plan, size

    @property
    def paged(self) -> bool:
        return bool(self.pages)

    def observe(self, plan: str, units: int, seconds: float, pages: int | None = None) -> None:
        """What a batch of ``plan`` did; the next batch's plan follows from it.

        ``pages``: the pages the batch touched; given, plans are rated by units per page.
        """
        self.runs[plan] += 1
        self.paces[plan].observe(units, seconds)
        if pages is not None:
            self.pages[plan] = self.pages.get(plan, 0) + pages
        if units <= 0:
            return
        # Half the last batch, half the batches before it: one slow batch (a checkpoint, the
        # app's load) halves a rate for one batch only, so it does not swap plans on its own.
        rate = units / max(pages, 1) if pages is not None else units / max(seconds, 1e-4)
        self.rates[plan] = (self.rates[plan] + rate) / 2 if plan in self.rates else rate
        if len(self.rates) < len(self.plans):
            return
        best = max(self.rates, key=self.rates.__getitem__)
        if best != self.best:
            self.best, self.between, self.since = best, 2, 0
        elif plan == self.best:
            self.since += 1
        else:
            self.between, self.since = min(2 * self.between, self.MOST_BETWEEN), 0
