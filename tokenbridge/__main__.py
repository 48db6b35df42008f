from tokenbridge.cli import main

main()
