"""hostd: one agent per host. Runs QEMU, speaks QMP, drives the source side of migrations."""
