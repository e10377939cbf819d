from taqrir.cli import main

main()
