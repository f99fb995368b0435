"""The run configs, installed as the package ``megatron_jrt.configs`` (see setup.py) so that
``importlib.resources`` finds them in editable and regular installs alike."""
