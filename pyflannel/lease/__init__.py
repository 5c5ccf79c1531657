"""Subnet leasing: the pure lease model and policy, and the etcd I/O around them."""
