"""The ORION-tree tier: the plugin tested against ORION's own code from an ORION checkout (``ORION_ROOT``)."""
