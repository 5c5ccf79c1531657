"""Network policy: labels, Calico-style selectors and rules kept in etcd, enforced with
nftables on every node, and explained by ``pyflannel policy trace``.

``selector.py`` (the selector grammar), ``model.py`` (policies, rules, network sets and their
validation), ``verdict.py`` (the pure evaluation ``trace`` uses) are pure; ``nft.py`` compiles
the model to one nftables ruleset and applies it atomically; ``keeper.py`` is the daemon task.
"""
