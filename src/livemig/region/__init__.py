"""A livemig region on one machine: the processes, their ports and (as root) namespace hosts.

    local      ``Region``: starts and stops the LMO, blockd, and per host a vswitch and a hostd
    hostns     namespace hosts: per host a network namespace with a service and a migration interface
    netplumb   the one place that runs ``ip`` and ``tc`` (namespaces, bridges, veths, qdiscs)
    freeport   free TCP/UDP ports in batches that cannot repeat a port
    proc       process liveness (pid alive, wait until gone)

Used by ``livemig up``/``down``, the demo, the tests and the benchmarks, so all of them start the
system the way a user does; hostd uses ``netplumb`` and ``proc`` for its namespaces and its QEMUs.
"""
