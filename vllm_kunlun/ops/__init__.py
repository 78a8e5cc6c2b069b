"""The kernel seam: ops declared in `library`, implemented by `reference` and `kunlun_binding`."""
