"""The LMO's REST routes, one module per resource: hosts (and evacuations), VMs, migrations,
the virtual network, volumes. Their models are the boundary's, in ``livemig.wire.lmo``."""
