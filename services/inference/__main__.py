from services.inference.app import main

main()
