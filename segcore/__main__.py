from segcore.cli import entry

entry()
