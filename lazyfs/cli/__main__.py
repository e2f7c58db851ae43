from lazyfs.entry import main

main()
