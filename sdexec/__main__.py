from sdexec.cli.client import entry

entry()
