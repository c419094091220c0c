// A small Go peer for tests/test_run_seccomp.py: Go's runtime makes its system calls
// itself (no libc), so LD_PRELOAD cannot reach it; built with CGO_ENABLED=0 it is static.
//
//	peer dial HOST:PORT   send "go", print the reply and the socket's SO_PROTOCOL
//	peer serve            listen on 127.0.0.1:0, print the port, answer one client
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
)

func protocol(c syscall.Conn) int {
	raw, _ := c.SyscallConn()
	proto := -1
	raw.Control(func(fd uintptr) {
		proto, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, 38) // SO_PROTOCOL
	})
	return proto
}

func main() {
	switch os.Args[1] {
	case "dial":
		conn, err := net.Dial("tcp", os.Args[2])
		if err != nil {
			fmt.Println("dial:", err)
			os.Exit(1)
		}
		defer conn.Close()
		conn.Write([]byte("go"))
		conn.(*net.TCPConn).CloseWrite()
		reply, _ := io.ReadAll(conn)
		fmt.Println(string(reply), protocol(conn.(*net.TCPConn)))
	case "serve":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fmt.Println("listen:", err)
			os.Exit(1)
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port, protocol(ln.(*net.TCPListener)))
		conn, err := ln.Accept()
		if err != nil {
			os.Exit(1)
		}
		conn.Write([]byte("from-go"))
		conn.Close()
	}
}
