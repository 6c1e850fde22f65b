"""Mail: the shared words of every stage (replies and verdicts, addresses, reply texts, why a
message waits); pure values and rules that never touch a socket, a file or the clock."""
