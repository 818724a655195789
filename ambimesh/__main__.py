from ambimesh.cli import main

main()
