from services.monitor.app import main

main()
