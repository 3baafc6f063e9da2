"""The VCN dataplane: a userspace virtual switch per host, built so a VNIC can migrate.

One module, one job::

    packets    wire codecs (Ethernet, ARP, IPv4, ICMP, TCP, UDP, VXLAN); MalformedPacket
    model      pydantic records: VCN, Subnet, VNIC, SecurityList, Mapping, FlowRecord, REST bodies
    conntrack  per-VNIC connection tracking with versioned export / delta / import
    seclist    security lists compiled for the data path; the filter decision
    envelope   the versioned, checksummed envelope for flow state moving between hosts
    handoff    the dual-ingress gate: hold, pause marker, exactly-once release
    ports      UDP sockets facing QEMU (-netdev dgram) and the overlay
    gateway    tap VNICs (optionally in a netns) so host processes can reach a subnet
    vswitch    the switch: pipeline, routing, overlay, migration surface (design notes inside)
    api        the REST API and ``run_vswitch`` (``livemig vswitch`` runs it)
    client     a small typed httpx client for the API
"""
