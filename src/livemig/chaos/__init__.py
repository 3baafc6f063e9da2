"""Chaos: break a region's real services at every stage of real migrations, and check that the
invariants of live migration hold throughout (``livemig chaos``, ``tests/chaos``).

    scenarios   the matrix: stage x target process x fault, and what must come of each
    runner      one scenario against a region: arm, migrate, inject at the stage, judge
    environment the region, the chaos VM and its gateways, the supervisor, undoing every fault
    invariants  the checks: sampled throughout (one running QEMU) and after (placement, guest, volume)
    external    faults from outside: signals, a partitioned migration link, PostgreSQL, a full disk
    qemus       the QEMU daemons of a VM on this machine and their runstates over QMP
"""
