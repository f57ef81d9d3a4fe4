package pgsql

// ServerSQL names the database and server a connection reached, for the
// CLI's messages: current_database(), the server's own address (text) and
// port. The address and port are NULL on a Unix-domain socket.
const ServerSQL = `SELECT pg_catalog.current_database()::text, pg_catalog.host(pg_catalog.inet_server_addr())::text, pg_catalog.inet_server_port()::integer`
