// Readiness probe for the local Kafka broker: succeeds once the broker answers a metadata
// request (describeCluster) at the given bootstrap address, fails after the deadline.
//
// Usage: java -cp <classes>:<kafka-libs>/* KafkaReady <bootstrap> <deadline-seconds>

import java.util.Properties;
import java.util.concurrent.TimeUnit;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.DescribeClusterResult;

public final class KafkaReady {
  public static void main(String[] args) throws Exception {
    String bootstrap = args[0];
    long deadline = System.nanoTime() + TimeUnit.SECONDS.toNanos(Long.parseLong(args[1]));
    Properties props = new Properties();
    props.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, bootstrap);
    props.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, "3000");
    props.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, "3000");
    Exception last = null;
    try (Admin admin = Admin.create(props)) {
      while (System.nanoTime() < deadline) {
        try {
          DescribeClusterResult cluster = admin.describeCluster();
          int brokers = cluster.nodes().get(3, TimeUnit.SECONDS).size();
          String id = cluster.clusterId().get(3, TimeUnit.SECONDS);
          if (brokers > 0) {
            System.out.println("kafka cluster " + id + " answers metadata with " + brokers + " broker(s)");
            return;
          }
        } catch (Exception e) {
          last = e;
        }
        Thread.sleep(250);
      }
    }
    System.err.println("kafka at " + bootstrap + " did not answer metadata requests: " + last);
    System.exit(1);
  }
}
