"""The read contract's conformance suite: docs/architecture.md's table, run on every front end.

How to add a row:

1. Add the row to the table in docs/architecture.md ("The read contract"): an id in the first
   column, the situation, what the reader gets, how many computations run; a front-end column
   only where that front end differs by design (``n/a: why`` where the situation cannot arise).
2. Write its scenario in ``scenarios.py``: ``@row("<id>")`` over an ``async def (fe, prefix)``
   that registers its keyspaces under ``prefix`` (no other test uses it), ``await fe.start()``,
   then reads and writes through the adapter (``frontends.py``) and asserts the cells. Its
   keyspace function is a ``handlers.Fn`` (runs counted per key); hold a computation with
   ``fn.hold()`` (a ``Gate``), wait on events or ``aeventually``, never sleep except for a real
   TTL (``elapse``).
3. A new client operation is a method on each adapter and a name in its ``ops``.
4. A cell that fails until a pending fix lands goes in ``test_contract.PENDING`` (strict xfail);
   any other failure is a defect to fix, not to mark.

``test_every_row_has_a_scenario`` fails while a row has no scenario or a scenario no row.
"""
