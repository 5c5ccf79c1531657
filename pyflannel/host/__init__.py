"""The host side: interfaces, addresses, routes (netlink), TUN devices, files for others."""
