from ztunnel.main import main

main()
