from irefine.cli import main

main()
