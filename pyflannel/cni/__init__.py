"""``pyflannel-cni``: the CNI plugin a container runtime calls as ``type: flannel``.

It reads the same network config keys as flannel's own CNI plugin (``subnetFile``,
``dataDir``, ``delegate``, ``ipam``), turns the node's subnet.env into a ``bridge`` +
``host-local`` config and hands the real work to those standard plugins, so a flannel
node's ``/etc/cni/net.d/10-flannel.conflist`` works unchanged on a pyflannel node.

Pieces: ``errors.py`` (the spec's error codes), ``netconf.py`` (pure: config and
subnet.env in, delegate config out), ``store.py`` (the saved delegate configs),
``invoke.py`` (running a delegate plugin), ``plugin.py`` (the commands and the entry point).
"""

from pyflannel.cni.plugin import main

__all__ = ["main"]
