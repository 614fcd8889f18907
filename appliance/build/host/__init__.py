"""The host image: a bootable GPT disk (UEFI and BIOS) that comes up as a ready appliance node.

image.py drives the build (stages, cache, manifest); root.py applies the roles to the image root; disk.py lays out
the partitions and installs GRUB. What runs on the node at boot is appliance/node_setup.py.
"""
