package testkit

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// NetServer is a PostgreSQL server of its own, running inside a Linux
// network namespace and reached from the test's namespace through a veth
// pair, so that nftables rules inside the namespace can silently drop the
// packets of chosen client connections: a kernel-level network partition,
// with no proxy in the path. Its settings are PostgreSQL's defaults
// (tcp_keepalives_* and tcp_user_timeout 0: the kernel's defaults, 7200 s
// idle), except fsync off and its addresses. Get it with NetNS.
type NetServer struct {
	slot      int
	ns        string // network namespace
	hostLink  string // the veth end in the test's namespace
	dir, data string
	bin       string
	lock      *os.File
	admin     *sql.DB // for looking up client ports; blocked by PartitionAll
}

// netPort is the NetServer's port inside its namespace.
const netPort = 5442

// NetNS returns the network-namespace server of this test binary, building
// it the first time. StopFixtures stops it and deletes its namespace,
// nftables table and directory.
//
// The server is slot s of 0-7 (the first whose file lock
// /tmp/pglocks-netns-<s>.lock is free, so concurrent test binaries get
// separate ones): namespace pglocks-ns<s>, veth pglk<s>h (10.213.<s>.1/30,
// the test's side) and pglk<s>n (10.213.<s>.2/30, inside), a cluster made by
// initdb in /tmp/pglocks-netns-<s> listening on 10.213.<s>.2:5442 with trust
// for 10.213.<s>.0/30, a database test, and the nftables table inet
// pglocks_partition in the namespace. Leftovers of a killed run in that slot
// (processes in the namespace, the namespace, the veth, the directory) are
// removed first.
//
// It needs root, ip (iproute2), nft (nftables) and PostgreSQL's server
// binaries (see BinDirEnv); otherwise the test is skipped or failed by
// Unavailable. It does not need PGLOCKS_TEST_DSN.
func NetNS(tb testing.TB) *NetServer {
	tb.Helper()
	netFixture.once.Do(func() { netFixture.s, netFixture.err = startNetServer() })
	if netFixture.err != nil {
		Unavailable(tb, "network-namespace server", netFixture.err)
	}
	return netFixture.s
}

// netFixture is the NetServer of this test binary.
var netFixture struct {
	once sync.Once
	s    *NetServer
	err  error
}

// Addr returns the server's address, as "10.213.<s>.2".
func (s *NetServer) Addr() string { return fmt.Sprintf("10.213.%d.2", s.slot) }

// DSN returns a URL DSN for database test as user postgres (trust), on
// Addr() port 5442, sslmode=disable.
func (s *NetServer) DSN() string {
	return fmt.Sprintf("postgres://postgres@%s:%d/test?sslmode=disable", s.Addr(), netPort)
}

// Partition drops every packet of the one client connection whose local
// (client) TCP port is clientPort, both to and from the server, with two
// rules in the namespace's nftables table; other connections are not
// affected. Nothing is sent to either side: the client's writes go
// unacknowledged and its reads wait, and the server's backend sees nothing
// until its own keepalive or tcp_user_timeout gives up. heal deletes the
// rules (packets flow again); it is idempotent and also registered with
// tb.Cleanup. A failure to add the rules fails the test.
func (s *NetServer) Partition(tb testing.TB, clientPort int) (heal func()) {
	tb.Helper()
	if clientPort <= 0 || clientPort > 65535 {
		tb.Fatalf("Partition: client port %d", clientPort)
	}
	return s.drop(tb, fmt.Sprintf("tcp sport %d ", clientPort), fmt.Sprintf("tcp dport %d ", clientPort))
}

// PartitionAll drops every packet to and from the server's port, for every
// client (including the NetServer's own connection that PartitionBackend
// uses), as Partition does for one. heal restores them; it is idempotent
// and also registered with tb.Cleanup.
func (s *NetServer) PartitionAll(tb testing.TB) (heal func()) {
	tb.Helper()
	return s.drop(tb, "", "")
}

// PartitionBackend partitions the connection of the server process pid
// (what pg_backend_pid() returns on that connection): it reads the
// connection's client_port from pg_stat_activity through a connection of
// its own, then calls Partition. It fails the test when pid has no TCP
// connection. It cannot be used while PartitionAll is in force.
func (s *NetServer) PartitionBackend(tb testing.TB, pid int) (heal func()) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var port sql.NullInt64
	err := s.admin.QueryRowContext(ctx, `SELECT client_port FROM pg_stat_activity WHERE pid = $1`, pid).Scan(&port)
	if err != nil || !port.Valid || port.Int64 <= 0 {
		tb.Fatalf("PartitionBackend: no TCP client port for backend %d: %v", pid, err)
	}
	return s.Partition(tb, int(port.Int64))
}

// drop adds the input rule (packets from the client: "tcp dport 5442"
// plus in) and the output rule (to the client: "tcp sport 5442" plus out).
func (s *NetServer) drop(tb testing.TB, in, out string) (heal func()) {
	tb.Helper()
	var handles []string
	var once sync.Once
	heal = func() {
		once.Do(func() {
			for i, h := range handles {
				chain := []string{"input", "output"}[i]
				if _, err := s.nft(context.Background(), "delete", "rule", "inet", "pglocks_partition", chain, "handle", h); err != nil {
					tb.Errorf("heal: %v", err)
				}
			}
		})
	}
	tb.Cleanup(heal)
	for _, r := range []struct{ chain, match string }{
		{"input", fmt.Sprintf("%stcp dport %d drop", in, netPort)},
		{"output", fmt.Sprintf("%stcp sport %d drop", out, netPort)},
	} {
		args := append([]string{"--echo", "--handle", "add", "rule", "inet", "pglocks_partition", r.chain}, strings.Fields(r.match)...)
		res, err := s.nft(context.Background(), args...)
		if err != nil {
			tb.Fatalf("Partition: %v", err)
		}
		h, err := ruleHandle(res)
		if err != nil {
			tb.Fatalf("Partition: %v", err)
		}
		handles = append(handles, h)
	}
	return heal
}

// ruleHandle reads the handle from `nft --echo --handle add rule` output.
func ruleHandle(out string) (string, error) {
	_, after, ok := strings.Cut(out, "# handle ")
	if !ok {
		return "", fmt.Errorf("no rule handle in nft output %q", out)
	}
	h := strings.Fields(after)
	if len(h) == 0 {
		return "", fmt.Errorf("no rule handle in nft output %q", out)
	}
	if _, err := strconv.Atoi(h[0]); err != nil {
		return "", fmt.Errorf("rule handle %q: %w", h[0], err)
	}
	return h[0], nil
}

// nft runs nft inside the namespace.
func (s *NetServer) nft(ctx context.Context, args ...string) (string, error) {
	return command(ctx, "ip", append([]string{"netns", "exec", s.ns, "nft"}, args...)...)
}

// inNS runs argv inside the namespace.
func (s *NetServer) inNS(ctx context.Context, argv ...string) (string, error) {
	return command(ctx, "ip", append([]string{"netns", "exec", s.ns}, argv...)...)
}

func startNetServer() (*NetServer, error) {
	if err := needRoot(); err != nil {
		return nil, err
	}
	for _, tool := range []string{"ip", "nft", "runuser"} {
		if _, err := command(context.Background(), "sh", "-c", "command -v "+tool); err != nil {
			return nil, fmt.Errorf("no %s (apt-get install iproute2 nftables)", tool)
		}
	}
	bin, err := pgBinDir(0)
	if err != nil {
		return nil, err
	}
	s, err := claimNetSlot(bin)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	if err := s.build(ctx); err != nil {
		s.stop()
		return nil, err
	}
	addFixture(s.stop)
	return s, nil
}

// claimNetSlot takes the first slot of 0-7 whose file lock is free and
// sweeps what a killed run left in it.
func claimNetSlot(bin string) (*NetServer, error) {
	for slot := 0; slot < 8; slot++ {
		lock, ok, err := lockFile(fmt.Sprintf("/tmp/pglocks-netns-%d.lock", slot))
		if err != nil {
			return nil, err
		}
		if !ok {
			continue
		}
		dir := fmt.Sprintf("/tmp/pglocks-netns-%d", slot)
		s := &NetServer{slot: slot, ns: fmt.Sprintf("pglocks-ns%d", slot), hostLink: fmt.Sprintf("pglk%dh", slot),
			dir: dir, data: filepath.Join(dir, "data"), bin: bin, lock: lock}
		s.sweep()
		return s, nil
	}
	return nil, errors.New("all 8 network-namespace slots are in use")
}

// sweep kills every process in the slot's namespace, deletes the
// namespace, the veth and the directory; missing pieces are ignored.
func (s *NetServer) sweep() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := command(ctx, "ip", "netns", "pids", s.ns); err == nil {
		for _, pid := range strings.Fields(out) {
			if n, err := strconv.Atoi(pid); err == nil {
				if p, err := os.FindProcess(n); err == nil {
					_ = p.Kill()
				}
			}
		}
		_ = poll(10*time.Second, 50*time.Millisecond, "the namespace's processes ending", func() (bool, error) {
			out, err := command(ctx, "ip", "netns", "pids", s.ns)
			return err != nil || strings.TrimSpace(out) == "", nil
		})
	}
	_, _ = command(ctx, "ip", "netns", "delete", s.ns)
	_, _ = command(ctx, "ip", "link", "delete", s.hostLink)
	_ = os.RemoveAll(s.dir)
}

func (s *NetServer) build(ctx context.Context) error {
	if err := s.network(ctx); err != nil {
		return err
	}
	if err := s.cluster(ctx); err != nil {
		return err
	}
	table := "table inet pglocks_partition {\n" +
		"  chain input { type filter hook input priority 0; policy accept; }\n" +
		"  chain output { type filter hook output priority 0; policy accept; }\n}\n"
	file := filepath.Join(s.dir, "partition.nft")
	if err := os.WriteFile(file, []byte(table), 0o600); err != nil {
		return err
	}
	if _, err := s.nft(ctx, "-f", file); err != nil {
		return err
	}
	admin, err := Open("pgx", strings.Replace(s.DSN(), "/test?", "/postgres?", 1))
	if err != nil {
		return err
	}
	if _, err := admin.ExecContext(ctx, `CREATE DATABASE test`); err != nil {
		admin.Close()
		return err
	}
	s.admin = admin
	return nil
}

// network creates the namespace and the veth pair.
func (s *NetServer) network(ctx context.Context) error {
	nsLink := fmt.Sprintf("pglk%dn", s.slot)
	host := fmt.Sprintf("10.213.%d.1/30", s.slot)
	steps := [][]string{
		{"ip", "netns", "add", s.ns},
		{"ip", "link", "add", s.hostLink, "type", "veth", "peer", "name", nsLink},
		{"ip", "link", "set", nsLink, "netns", s.ns},
		{"ip", "addr", "add", host, "dev", s.hostLink},
		{"ip", "link", "set", s.hostLink, "up"},
		{"ip", "netns", "exec", s.ns, "ip", "addr", "add", s.Addr() + "/30", "dev", nsLink},
		{"ip", "netns", "exec", s.ns, "ip", "link", "set", nsLink, "up"},
		{"ip", "netns", "exec", s.ns, "ip", "link", "set", "lo", "up"},
	}
	for _, argv := range steps {
		if _, err := runArgv(ctx, argv); err != nil {
			return err
		}
	}
	return nil
}

// cluster makes and starts the server inside the namespace.
func (s *NetServer) cluster(ctx context.Context) error {
	if err := makePostgresDir(s.dir); err != nil {
		return err
	}
	if _, err := runArgv(ctx, asPostgres(filepath.Join(s.bin, "initdb"), "-D", s.data, "-U", "postgres",
		"--auth=trust", "-E", "UTF8", "--no-sync")); err != nil {
		return err
	}
	conf := fmt.Sprintf("\nlisten_addresses = '%s'\nport = %d\nunix_socket_directories = '%s'\nfsync = off\n", s.Addr(), netPort, s.dir)
	f, err := os.OpenFile(filepath.Join(s.data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(conf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	hba := fmt.Sprintf("local all all trust\nhost all all 10.213.%d.0/30 trust\n", s.slot)
	if err := writePostgresFile(filepath.Join(s.data, "pg_hba.conf"), hba); err != nil {
		return err
	}
	_, err = s.inNS(ctx, asPostgres(filepath.Join(s.bin, "pg_ctl"), "-D", s.data, "-l", filepath.Join(s.dir, "server.log"),
		"-w", "-t", "60", "start")...)
	return err
}

// stop stops the server and removes the namespace, the veth, the
// directory and the slot's lock.
func (s *NetServer) stop() {
	if s.admin != nil {
		s.admin.Close()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := os.Stat(filepath.Join(s.data, "postmaster.pid")); err == nil {
		_, _ = s.nft(ctx, "delete", "table", "inet", "pglocks_partition") // a partition would slow a fast stop
		_, _ = s.inNS(ctx, asPostgres(filepath.Join(s.bin, "pg_ctl"), "-D", s.data, "-m", "immediate", "-w", "-t", "20", "stop")...)
	}
	s.sweep()
	s.lock.Close()
}
