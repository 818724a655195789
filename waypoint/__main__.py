from waypoint.main import main

main()
