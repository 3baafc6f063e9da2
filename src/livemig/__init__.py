"""livemig: live migration for QEMU/KVM fleets.

The package is split by process: ``host`` (hostd), ``control`` (the LMO control plane),
``guest`` (guest image and workload), ``cli`` (the ``livemig`` command). ``model`` holds the
typed records every process shares, ``errors`` the one exception tree.
"""

__version__ = "0.1.0"
