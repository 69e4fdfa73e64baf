from jaxpar.cli import entry

entry()
