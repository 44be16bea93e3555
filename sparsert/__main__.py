from sparsert.cli import main

main()
