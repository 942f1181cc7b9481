from adapterkit.cli import entry

entry()
