from lazyfs.cli import main

main()
