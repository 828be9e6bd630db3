"""The canary's gates on the real stack: one entry point per gate, for the flow and the CLI.

The decisions are pure (:mod:`tuneloop.services.canary.core` and ``.live``); the records
go through :func:`tuneloop.services.canary.records.record`. Here each gate fetches what
its decision needs and carries out what it says:

- :mod:`.offline`: :func:`~.offline.offline_gate` evaluates the candidate against the
  incumbent through the gateway; :func:`~.offline.conclude_offline` rejects it or
  opens its live window.
- :mod:`.live`: :func:`~.live.look` at the live window, :func:`~.live.resume` it after
  a crash, :func:`~.live.conclude` it (promote or roll back).
- :mod:`.production`: :func:`~.production.check_production`, the nightly freeze check.
- :mod:`.manual`: :func:`~.manual.rollback_by_hand`, ``tuneloop canary rollback``.

Every swap goes through :mod:`tuneloop.serving.control`, so the gateway flips before the
registry records (and flips back if the record fails).
"""
