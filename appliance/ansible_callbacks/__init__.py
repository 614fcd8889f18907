"""Ansible callback plugins `appliance deploy` enables (ANSIBLE_CALLBACK_PLUGINS points at this directory)."""
