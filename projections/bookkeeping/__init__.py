"""The read side's bookkeeping SQL, all of it, in this folder: checkpoints, halts, parked
orders and events, and the version registry (the tables in ``schema.BOOKKEEPING``).

Each function runs in the caller's transaction, on its raw asyncpg connection. Many keys at a
time travel as one array per column, taken apart by ``unnest`` (``arrays.py``): one statement
whatever their number.

Checkpoint moves are compare-and-set (design.md, invariant 6): ``advance_checkpoints`` moves
a checkpoint only from the offset its caller expects, and raises ``StaleCheckpoint`` when any
was elsewhere, so the caller's whole transaction rolls back.
"""
