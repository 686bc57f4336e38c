"""The heiindex command line (installed as the ``heiindex_cli`` package): thin click commands."""
