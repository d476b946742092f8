// Command grpc-go-client is a Go service's view of coord's registry: it
// dials a target with grpc-go, etcd's own resolver
// (go.etcd.io/etcd/clientv3/naming/resolver) and the round_robin balancer,
// exactly as a Go client of a coord-registered service would, and calls
// grpc.health.v1.Health/Check every -interval until it is killed. Each call
// prints one line: "ok <address that answered>" or "error <reason>".
//
// The integration test `services::a_grpc_go_client_reaches_the_instances_through_the_documented_target`
// builds it in GOPATH mode from Debian's packages (golang-go,
// golang-etcd-server-dev, golang-google-grpc-dev), with no network:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o grpc-go-client ./tests/interop/grpc-go
//	./grpc-go-client -endpoints http://127.0.0.1:2379 -target 'etcd:////coord/services/api/'
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"go.etcd.io/etcd/clientv3"
	"go.etcd.io/etcd/clientv3/naming/resolver"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/peer"
)

func main() {
	endpoints := flag.String("endpoints", "http://127.0.0.1:2379", "etcd endpoints, comma-separated")
	target := flag.String("target", "", "the gRPC target, e.g. etcd:////coord/services/api/")
	interval := flag.Duration("interval", 50*time.Millisecond, "time between calls")
	flag.Parse()
	if *target == "" {
		fmt.Fprintln(os.Stderr, "grpc-go-client: -target is required")
		os.Exit(2)
	}

	etcd, err := clientv3.New(clientv3.Config{
		Endpoints:   strings.Split(*endpoints, ","),
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpc-go-client: cannot connect to etcd: %v\n", err)
		os.Exit(1)
	}
	defer etcd.Close()
	builder, err := resolver.NewBuilder(etcd)
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpc-go-client: cannot build the etcd resolver: %v\n", err)
		os.Exit(1)
	}
	conn, err := grpc.Dial(*target,
		grpc.WithResolvers(builder),
		grpc.WithInsecure(),
		grpc.WithDefaultServiceConfig(`{"loadBalancingPolicy":"round_robin"}`),
	)
	if err != nil {
		fmt.Fprintf(os.Stderr, "grpc-go-client: cannot dial %s: %v\n", *target, err)
		os.Exit(1)
	}
	defer conn.Close()

	health := grpc_health_v1.NewHealthClient(conn)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		var p peer.Peer
		_, err := health.Check(ctx, &grpc_health_v1.HealthCheckRequest{}, grpc.Peer(&p))
		cancel()
		if err != nil {
			fmt.Printf("error %v\n", err)
		} else {
			fmt.Printf("ok %s\n", p.Addr)
		}
		time.Sleep(*interval)
	}
}
