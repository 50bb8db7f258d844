"""The commands: one module per ``esft <name>``, each with ``main(argv)``. The top floor: library
modules (everything else under `esft`) never import from here."""
