"""Security foundations: the region CA (``pki``), mutual TLS for services (``tls``), QEMU's TLS (``qemu_tls``)."""
