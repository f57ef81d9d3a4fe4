//go:build unix

package main

import (
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// foreground reports whether pglock runs as the foreground process group of
// the terminal on stdin: then the command must get the terminal to itself,
// or reading from it would stop it (SIGTTIN).
func foreground() bool {
	pgrp, err := unix.IoctlGetInt(0, unix.TIOCGPGRP)
	return err == nil && pgrp == syscall.Getpgrp()
}

// procAttr puts the command in a process group of its own, so that pglock
// can signal everything it starts; in the foreground of a terminal, that
// group becomes the terminal's foreground group.
func procAttr(fg bool) *syscall.SysProcAttr {
	if fg {
		return &syscall.SysProcAttr{Setpgid: true, Foreground: true, Ctty: 0}
	}
	return &syscall.SysProcAttr{Setpgid: true}
}

// reclaimTerminal makes pglock's process group the terminal's foreground
// group again after the command exits.
func reclaimTerminal() {
	signal.Ignore(syscall.SIGTTOU)
	defer signal.Reset(syscall.SIGTTOU)
	_ = unix.IoctlSetPointerInt(0, unix.TIOCSPGRP, syscall.Getpgrp())
}

// signalGroup sends sig to the command's process group (its pid, since it
// leads the group); if the group is gone, to the process itself.
func signalGroup(p *os.Process, sig os.Signal) error {
	s, ok := sig.(syscall.Signal)
	if !ok {
		return p.Signal(sig)
	}
	if err := syscall.Kill(-p.Pid, s); err == nil {
		return nil
	}
	return p.Signal(sig)
}

// groupAlive reports whether process group pgid still has a process (a
// zombie not yet reaped by its new parent counts).
func groupAlive(pgid int) bool { return syscall.Kill(-pgid, 0) == nil }
