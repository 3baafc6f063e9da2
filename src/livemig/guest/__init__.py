"""The livemig guest: a Debian cloud kernel plus a busybox initramfs running the memory workload.

The workload (``workload.c``) dirties its working set at a set rate and, on ``check``, verifies
every page against the generation it last wrote: the guest-side proof that a live migration lost
or corrupted no memory. In disk mode it also appends a checksummed log to a block device and, on
``diskcheck``, proves no acknowledged record was lost (:mod:`livemig.guest.disklog` reads the same
log from the host); in network mode it serves TCP echo and a UDP sequence sink and runs a TCP
client, counting every loss. :func:`livemig.guest.image.build_image` builds and caches the image.
"""
