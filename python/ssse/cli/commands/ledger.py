"""``ssse ledger check`` and ``ssse ledger recover``: verify a ledger and the files it serves,
or settle a request that a crash interrupted (:mod:`ssse.service`)."""

from __future__ import annotations

from ssse.service import check_ledger, recover_ledger

from ..common import BUILT_IN_NAMES as NAMES

__all__ = ["run"]


def run(args) -> int:
    if args.action == "recover":
        report = recover_ledger(args.ledger, args.model, args.fisher, on_recover=print,
                                names=NAMES)
        if not report.recovered:
            print("nothing to recover")
    else:
        report = check_ledger(args.ledger, args.model, args.fisher, names=NAMES)
    state = report.state
    n, last = len(state.entries), state.last
    old = f"; the first {state.unchained} of ledger version 1, unchained" \
        if state.unchained else ""
    print(f"{args.ledger}: {n} request{'s' * (n != 1)}, chain intact{old}" +
          (f"; last {last['request']!r} served {last.get('time')}, {last.get('n_after')} "
           "samples left" if last else ""))
    at = f"at request {last['request']!r}" if last else "before any request"
    for what, served in report.files.items():
        health = report.health
        extra = f"; health {health.residual:.1e} (threshold {health.tolerance:.1e})" \
            if what == "inverse" and health is not None else ""
        print(f"{served.path}: the {what} {at} ({served.fingerprint[:19]}...){extra}")
    return 0
