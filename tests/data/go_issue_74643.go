// Go issue 74643 and a real BGP-style MD5-signed exchange, for tests/test_run_repair.py.
// Since Go 1.24, net.Listen makes MPTCP sockets, on which TCP_MD5SIG fails with
// ENOPROTOOPT. Standard library only (the program uses x/sys/unix; the
// setsockopt here is the same call through syscall).
//
//	prog check            the program: prints "TCP_MD5SIG is [not ]available"
//	prog serve KEY        listen on 127.0.0.1:0, then set the MD5 key for 127.0.0.1 on
//	                      the listener (as GoBGP does), print the port and SO_PROTOCOL,
//	                      answer one signed OPEN with KEEPALIVE
//	prog dial PORT KEY    MPTCP dialer whose Control sets the MD5 key (as GoBGP's does)
package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"unsafe"
)

const tcpMD5SIG = 14

type tcpMD5Sig struct {
	addr      [128]byte // struct sockaddr_storage
	flags     uint8
	prefixlen uint8
	keylen    uint16
	ifindex   int32
	key       [80]byte
}

func setMD5(fd uintptr, address, key string) error {
	sig := tcpMD5Sig{}
	ip := net.ParseIP(address).To4()
	*(*uint16)(unsafe.Pointer(&sig.addr[0])) = syscall.AF_INET
	copy(sig.addr[4:8], ip)
	sig.keylen = uint16(len(key))
	copy(sig.key[:], key)
	_, _, errno := syscall.Syscall6(syscall.SYS_SETSOCKOPT, fd, syscall.IPPROTO_TCP, tcpMD5SIG,
		uintptr(unsafe.Pointer(&sig)), unsafe.Sizeof(sig), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

func protocol(c syscall.Conn) int {
	raw, _ := c.SyscallConn()
	proto := -1
	raw.Control(func(fd uintptr) {
		proto, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, 38) // SO_PROTOCOL
	})
	return proto
}

// TCPMD5SigAvailable is the function from the issue.
func TCPMD5SigAvailable() (bool, error) {
	listener, err := net.Listen("tcp", "localhost:0")
	if err != nil {
		return false, fmt.Errorf("listen failed: %w", err)
	}
	defer listener.Close()
	fd, err := listener.(*net.TCPListener).File()
	if err != nil {
		return false, fmt.Errorf("error retrieving socket's file descriptor: %w", err)
	}
	defer fd.Close()
	err = setMD5(fd.Fd(), "1.2.3.4", "key")
	if err != nil {
		if errors.Is(err, syscall.ENOPROTOOPT) {
			return false, nil // "protocol not available"
		}
		return false, fmt.Errorf("other error by setting setting socket option: %w", err)
	}
	return true, nil
}

func fail(what string, err error) {
	fmt.Println(what+":", err)
	os.Exit(1)
}

func main() {
	switch os.Args[1] {
	case "check":
		available, err := TCPMD5SigAvailable()
		if err != nil {
			fmt.Printf("Error checking TCP_MD5SIG availability: %v\n", err)
			return
		}
		if available {
			fmt.Println("TCP_MD5SIG is available")
		} else {
			fmt.Println("TCP_MD5SIG is not available")
		}
	case "serve":
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			fail("listen", err)
		}
		raw, _ := ln.(*net.TCPListener).SyscallConn()
		var serr error
		raw.Control(func(fd uintptr) { serr = setMD5(fd, "127.0.0.1", os.Args[2]) })
		if serr != nil {
			fail("setsockopt TCP_MD5SIG", serr)
		}
		fmt.Println(ln.Addr().(*net.TCPAddr).Port, protocol(ln.(*net.TCPListener)))
		conn, err := ln.Accept()
		if err != nil {
			fail("accept", err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(conn, buf); err != nil {
			fail("read", err)
		}
		conn.Write([]byte("KEEPALIVE"))
		fmt.Println(string(buf), protocol(conn.(*net.TCPConn)))
		conn.Close()
	case "dial":
		d := net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
			var serr error
			c.Control(func(fd uintptr) { serr = setMD5(fd, "127.0.0.1", os.Args[3]) })
			return serr
		}}
		d.SetMultipathTCP(true)
		conn, err := d.Dial("tcp", "127.0.0.1:"+os.Args[2])
		if err != nil {
			fail("dial", err)
		}
		conn.Write([]byte("OPEN"))
		reply, _ := io.ReadAll(conn)
		fmt.Println(string(reply), protocol(conn.(*net.TCPConn)))
	}
}
