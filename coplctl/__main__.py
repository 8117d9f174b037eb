from coplctl.cli import main

main()
