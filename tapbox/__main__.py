from tapbox.cli import entry

entry()
